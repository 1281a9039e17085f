"""The pipeline's stages, in the order a file goes through them:
watch, stabilise, queue, upload, finish.
"""
