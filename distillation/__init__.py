"""Knowledge distillation of a frozen Geneformer teacher into a small student.

Teacher loading and checks, loss terms, student initialization, and the distillation task for the shared loop.
"""
