from ddsedit.cli import main

main()
