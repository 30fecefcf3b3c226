"""Which process this is among a run's processes, and their collective calls.

A run launched with several processes (accelerate: DDP, DeepSpeed ZeRO) has one
:class:`Processes`, built once from its `accelerate.Accelerator` and passed wherever a
process needs its place: the runner, the training loop and its step checkpoints, a world's
measures, a method's step inputs, the image tokenizer and the command line (the main
process prints). Without an accelerator it is one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

T = TypeVar("T")


def zero_stage(accelerator: Accelerator | None) -> int | None:
    """The ZeRO stage of the accelerator's DeepSpeed config; None without DeepSpeed."""
    plugin = None if accelerator is None else accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes (``accelerator``'s; None: one
    process), and the calls every process makes together."""

    accelerator: Accelerator | None = None

    @property
    def rank(self) -> int:
        """This process's index, 0 to ``count - 1``."""
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def count(self) -> int:
        """How many processes the run has."""
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def main(self) -> bool:
        """Whether this is the main process, the one that writes and prints."""
        return self.rank == 0

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage; None without DeepSpeed."""
        return zero_stage(self.accelerator)

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This process's share of ``items``: every ``count``-th from its ``rank``."""
        return items[self.rank :: self.count]

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's ``items``, in process order, in every process."""
        return gather_object(items) if self.count > 1 else items

    def broadcast(self, item: T, source: int) -> T:
        """Process ``source``'s ``item``, in every process."""
        if self.count == 1:
            return item
        holder = [item]
        broadcast_object_list(holder, from_process=source)
        return holder[0]

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


ONE_PROCESS = Processes()  # a run without accelerate
