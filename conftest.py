"""peft-kernel's own suite (tests/, plugins/*/tests, examples/*/tests) runs offline: every model it
needs is built from a config. Set here rather than in peft-kernel-testing's pytest plugin, which
users' test runs load too."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
