"""npu_ops: Ascend NPU fused MoE / quantization operators for JAX, with torch_npu semantics.

torch_npu-named ops (semantics A.1) sit beside JAX-style building blocks. "semantics X.Y"
in a docstring is section X.Y of docs/semantics.md in the repository.
"""

from npu_ops._src.backend import IMPLEMENTATIONS as IMPLEMENTATIONS
from npu_ops._src.grouped import GmmBlockSizes as GmmBlockSizes
from npu_ops._src.grouped import grouped_matmul as grouped_matmul
from npu_ops._src.grouped import tgmm as tgmm
from npu_ops._src.gmm_swiglu_quant import npu_grouped_matmul_swiglu_quant as npu_grouped_matmul_swiglu_quant
from npu_ops._src.gmm_swiglu_quant import npu_grouped_matmul_swiglu_quant_v2 as npu_grouped_matmul_swiglu_quant_v2
from npu_ops._src.gmm_swiglu_quant import weight_assist_matrix as weight_assist_matrix
from npu_ops._src.npu_grouped_matmul import npu_grouped_matmul as npu_grouped_matmul
from npu_ops._src.groups import check_group_list as check_group_list
from npu_ops._src.validation import debug_checks as debug_checks
from npu_ops._src.groups import group_ends as group_ends
from npu_ops._src.layouts import FORMAT_ND as FORMAT_ND
from npu_ops._src.layouts import FORMAT_NZ as FORMAT_NZ
from npu_ops._src.layouts import from_nz as from_nz
from npu_ops._src.layouts import int4pack_to_native as int4pack_to_native
from npu_ops._src.layouts import native_to_int4pack as native_to_int4pack
from npu_ops._src.layouts import npu_convert_int4pack_to_weight as npu_convert_int4pack_to_weight
from npu_ops._src.layouts import npu_convert_weight_to_int4pack as npu_convert_weight_to_int4pack
from npu_ops._src.layouts import npu_format_cast as npu_format_cast
from npu_ops._src.layouts import pack_int4 as pack_int4
from npu_ops._src.layouts import to_nz as to_nz
from npu_ops._src.layouts import unpack_int4 as unpack_int4
from npu_ops.moe import combine as combine
from npu_ops.moe import dispatch as dispatch
from npu_ops.moe import top_k_routing as top_k_routing
from npu_ops._src.qat import dynamic_fake_quant as dynamic_fake_quant
from npu_ops._src.qat import fake_quant as fake_quant
from npu_ops._src.qat import fake_quant_gmm_swiglu_quant as fake_quant_gmm_swiglu_quant
from npu_ops._src.qat import fake_quant_mx as fake_quant_mx
from npu_ops._src.qat import fake_quant_weight as fake_quant_weight
from npu_ops._src.qat import quantize as quantize
from npu_ops._src.qat import quantize_weight as quantize_weight
from npu_ops._src.qat import weight_scale_from_amax as weight_scale_from_amax
from npu_ops._src.quant import DynamicQuant as DynamicQuant
from npu_ops._src.quant import dequantize_mx as dequantize_mx
from npu_ops._src.quant import quantize_mx as quantize_mx
from npu_ops._src.quant import quantize_per_token as quantize_per_token
from npu_ops._src.quant import swiglu as swiglu
from npu_ops._src.quant_matmul import decode_quant_param as decode_quant_param
from npu_ops._src.quant_matmul import npu_quant_matmul as npu_quant_matmul
from npu_ops._src.quant_matmul import npu_trans_quant_param as npu_trans_quant_param
from npu_ops._src.scales import float32_from_scale_words as float32_from_scale_words
from pallas_kernels.common import TileSizes as TileSizes
from npu_ops._src.weight_quant import npu_weight_quant_batchmatmul as npu_weight_quant_batchmatmul

__version__ = "0.1.0"
