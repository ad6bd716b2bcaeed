"""The pluggy markers. Kept free of heavy imports so plugin entry modules stay cheap to import."""

import pluggy

PROJECT_NAME = "peft_kernel"
"""The pluggy project name; also the entry-point group plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
