"""MoDE under the paper code's task routing policy: per token in training; when
answering every token goes to the text branch, when drawing and in the student pass to
the image branch."""

from modecl.core.methods.distillation import Distilling

METHOD = Distilling("mode-task", kind="mode", policy="task")
