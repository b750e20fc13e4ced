"""`python -m training --stage 1|2 ...`: see training/train.py."""
from training.train import main

if __name__ == "__main__":
    main()
