"""sdalign_rt: speculative decoding between different (multimodal) models, with fused Triton kernels."""
from sdalign_rt import ops
from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.decode_step import DecodeStep
from sdalign_rt.decoder import GenerateOutput, SpeculativeDecoder
from sdalign_rt.tree_masks import TreeMasks
from sdalign_rt.tree_planner import plan_tree
from sdalign_rt.trees import TreeSpec, select_dynamic_tree
from sdalign_rt.vocab import VocabMap

__version__ = "0.1.0"
__all__ = ["ops", "BottleneckAdapter", "DecodeStep", "SpeculativeDecoder", "GenerateOutput", "TreeMasks", "TreeSpec",
           "plan_tree", "select_dynamic_tree", "VocabMap", "__version__"]
