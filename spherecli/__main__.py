from spherecli.cli import main

main()
