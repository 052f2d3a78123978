from twin.cli.main import main

main()
