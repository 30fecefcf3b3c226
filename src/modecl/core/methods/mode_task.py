"""MoDE under the paper code's task routing policy: per token in training; when
answering every token goes to the text branch, when drawing and in the student pass to
the image branch."""

from modecl.core.methods.base import Method

METHOD = Method("mode-task", kind="mode", policy="task", distill=True)
