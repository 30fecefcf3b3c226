"""MoDE under the paper code's task routing policy (per token in training; answering all text, drawing and the student pass all image)."""

from modecl.methods.base import Method

METHOD = Method("mode-task", kind="mode", policy="task", distill=True)
