from dsearch.cli import main

main()
