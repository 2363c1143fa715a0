from vztt.cli.main import main

main()
