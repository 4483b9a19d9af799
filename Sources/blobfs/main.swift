print("blobfs: not built yet")
