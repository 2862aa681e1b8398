from dsparse_cli.cli import main

main()
