from bdbench.cli import main

main()
