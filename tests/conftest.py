import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Servers the tests start check the tree cache whenever idle, kvflow's ownership bookkeeping included
# (patches/idle_integrity.py), as SGLang's own CI does.
os.environ.setdefault("SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK", "1")
