"""Run ``peft-kernel`` under torchrun (what the console script does: ``sys.exit(main())``), recording
every ``PeftModel.save_pretrained`` call with the rank that made it into ``$SAVE_LOG.<rank>``, and
each rank's trained adapter (a checksum, in ``$SAVE_LOG.params.<rank>``) to show the ranks trained
one model together (under ``--fsdp`` too: the full tensors of the shards)."""

import json
import os
import sys

from peft_kernel.cli import main
from peft_kernel.model import PeftModel

original = PeftModel.save_pretrained


def recording_save_pretrained(self, save_directory, *args, **kwargs):
    with open(f"{os.environ['SAVE_LOG']}.{os.environ['RANK']}", "a") as log:
        log.write(json.dumps({"rank": int(os.environ["RANK"]), "dir": str(save_directory),
                              "is_main_process": kwargs.get("is_main_process", True)}) + "\n")
    return original(self, save_directory, *args, **kwargs)


PeftModel.save_pretrained = recording_save_pretrained

from peft_kernel_finetune.trainer import Trainer  # noqa: E402

original_train = Trainer.train


def recording_train(self, *args, **kwargs):
    result = original_train(self, *args, **kwargs)
    trained = [p.detach() for p in self.model.parameters() if p.requires_grad]
    # FSDP2 shards (DTensors): the full tensors (a collective, every rank gathers the same)
    trained = [(p.full_tensor() if hasattr(p, "full_tensor") else p).double() for p in trained]
    with open(f"{os.environ['SAVE_LOG']}.params.{os.environ['RANK']}", "w") as out:
        json.dump({"wrapped": type(self.model_wrapped).__name__, "sum": sum(float(p.sum()) for p in trained),
                   "abs": sum(float(p.abs().sum()) for p in trained)}, out)
    return result


Trainer.train = recording_train
if __name__ == "__main__":
    sys.exit(main())
