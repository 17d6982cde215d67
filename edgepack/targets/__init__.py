"""Deployable targets, one module per target registered in one table (issues #4-#6: ort, ort-mobile, coreml, qnn)."""
