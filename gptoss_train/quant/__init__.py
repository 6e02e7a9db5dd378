"""MXFP4 codec (:mod:`.mxfp4`), requantization of tuned experts and QAT fake-quant."""
