"""The embed job's pieces: model directories, cell sources, resumable part files and the outputs.

embed.py puts them together; the forward pass and pooling are model.cell_embeddings', shared with evaluate.py.
"""
