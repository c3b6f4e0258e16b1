"""`python cli.py ...` from a checkout: the same as the installed `mealkd` command (mealkd.cli)."""
from mealkd.cli import main

if __name__ == "__main__":
    main()
