"""`slimlm compress`: chain pruning, distillation and quantization stages, measuring every stage in a ledger."""
