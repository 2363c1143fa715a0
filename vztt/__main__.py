from vztt.cli import main

main()
