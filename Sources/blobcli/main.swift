print("blobcli: not built yet")
