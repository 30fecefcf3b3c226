"""MoDE under the sample policy: every token follows its sample's output modality,
so no understanding loss reaches the V-Adapter."""

from modecl.core.methods.distillation import Distilling

METHOD = Distilling("mode-sample", kind="mode", policy="sample")
