"""`python -m kdprompt` (also `accelerate launch -m kdprompt ...`)."""

from kdprompt.cli import main

if __name__ == "__main__":
    main()
