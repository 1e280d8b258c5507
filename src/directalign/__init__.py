"""directalign: a reproducible pipeline for direct alignment (DPO, IPO, CoPG, length-averaged)."""
