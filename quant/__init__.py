"""Quantization math (AWQ, RTN, packing, importance matrices), independent of file formats."""
