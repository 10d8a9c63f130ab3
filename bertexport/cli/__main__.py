from bertexport.cli import main

main()
