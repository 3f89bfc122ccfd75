"""exl3_triton.convert: the EXL3 converter (unquantized Hugging Face model -> EXL3 directory).

    from exl3_triton.convert import ConvertOptions, convert_model
    convert_model("llama-hf", "llama-exl3", ConvertOptions(bits=4, codebook="mcg"))

Modules, in the order the data flows:

    families.py        which linears of an architecture are quantized, and how they group
    allocation.py      bits per linear so the average meets --bits
    calibration.py     calibration token ids (bundled text + random + structured)
    hessian.py         input Hessians, sign flips + Hadamard, block LDL
    quantize_linear.py regularise, global scale, LDLQ, pack -> EXL3 tensors
    scale_search.py    the global scale search
    tile_encoder.py    tail-biting Viterbi over 2^16 states, bitstream packing
    writer.py          safetensors shards, config.json, quantization_config.json
    work_dir.py        the resumable OUT_DIR/.work
    pipeline.py        convert_model: the layer-by-layer driver
"""

from .options import ConvertOptions
from .pipeline import ConversionResult, ConvertProgress, TensorRecord, convert_model, stderr_progress

__all__ = ["ConversionResult", "ConvertOptions", "ConvertProgress", "TensorRecord", "convert_model",
           "stderr_progress"]
