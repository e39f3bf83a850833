from kwasm_py.cli import main

main()
