"""TensorFlow: the SAM step (`step`), its clean passes (`passes`),
replicas under `tf.distribute` (`replicas`), sparse rows and the fused norm
(`gradients`), and what the analysis tools need (`analysis`)."""
