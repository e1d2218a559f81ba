"""PyTorch: the SAM step (`step`, on top of `keras_sam.backend.stateless`)
and what the analysis tools need (`analysis`)."""
