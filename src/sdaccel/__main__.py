from sdaccel.cli import main

main()
