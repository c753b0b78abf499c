"""The correction's defaults that the command line shows in its options and help.

A module with nothing heavy imported (as audit/samples.py for the samples file's names): ``core.cav`` loads
scikit-learn and ``core.clarc`` torch, 3 of the 4 seconds that ``unhans --help`` took while the CLI imported these
values from them. The fitting code reads them from here too, so each is defined once.
"""

CAV_METHODS = ("pattern", "svm", "logistic")  # how a CAV's direction is fitted; the first is the default
ENERGY_SHARE = 0.9  # 'auto' directions: the smallest subspace holding this share of the paired differences' energy ...
MAX_DIRECTIONS = 8  # ... with at most this many directions (and never more than half the pairs: see core.cav._subspace)

ACLARC_FRACTION = 0.5  # share of the training images A-ClArC pastes the artifact into
ACLARC_EPOCHS = 1  # fine-tuning epochs: a second one let a moving tag's attack success creep back up (0.006 -> 0.010)
ACLARC_LR = 3e-4  # Adam's step: a third of training's; 1e-3 moved clean accuracy by up to 1.1 points between seeds
