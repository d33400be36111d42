"""The model's satellites: stock-weight reading and renaming, attention layouts, packed attention, TE layers, and
the writer of stock Hugging Face model directories. `modeling_bert_te.py` (the model itself) stays at the root.
"""
