import os
import sys

# Tests import the stage modules from the repository root, as the scripts do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
