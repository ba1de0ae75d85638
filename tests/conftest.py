import sys
from pathlib import Path

# train.py and sample.py live at the repository root; tests import their config classes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
