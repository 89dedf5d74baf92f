"""`python -m autoglm_distill recipe=NAME [overrides]`."""

from autoglm_distill.run import main

if __name__ == "__main__":
    main()
