/// Read-only views of a loaded store for offline inspection (blobcli): where each blob's
/// metadata lives on the device and what each page says about itself.
public struct ChainPage: Sendable {
    public var pageID: UInt32
    /// Device byte offset of the page.
    public var offset: UInt64
    /// nil when the page decodes (magic, CRC, header); otherwise what is wrong.
    public var problem: String?
    public var blobID: BlobID?
    public var chainIndex: UInt32?
    public var nextPage: UInt32?
    public var checkpointSequence: UInt64?
}

extension BlobStore {
    /// The metadata pages of `id`'s chain as of the checkpoint (empty for a blob created
    /// since), each re-read and decoded.
    public func chainPages(_ id: BlobID) -> [ChainPage] {
        _ = blobs[id]  // reads the chain if the load left it unread
        return (durableChains[id] ?? []).map(inspectMetadataPage)
    }

    /// Every metadata page the checkpoint's chains use, by page id, with its owner: of
    /// the chains read so far (`readAllChains` first for all of them).
    public var metadataPageOwners: [(page: UInt32, blob: BlobID)] {
        durableChains.flatMap { id, pages in pages.map { ($0, id) } }.sorted { $0.page < $1.page }
    }

    /// Whether the blob changed since the checkpoint (its chain on the device is older
    /// than what the log replay produced).
    public func changedSinceCheckpoint(_ id: BlobID) -> Bool { dirtyBlobs.contains(id) }

    public func inspectMetadataPage(_ pageID: UInt32) -> ChainPage {
        let page = superBlock.metadataPageAddress(pageID)
        let offset = page * UInt64(Self.pageBytes)
        var result = ChainPage(pageID: pageID, offset: offset)
        do {
            guard UInt64(pageID) < superBlock.metadataPageIDLimit else {
                throw BlobStoreError.invalidArgument("metadata page \(pageID) is outside the store's \(superBlock.metadataPageIDLimit)")
            }
            let bytes = try readPages(at: page, count: 1)
            let decoded = try MetadataPage.decodePage(bytes[...], offset: offset, pageID: pageID)
            result.blobID = decoded.blobID
            result.chainIndex = decoded.chainIndex
            result.nextPage = decoded.nextPage
            result.checkpointSequence = decoded.checkpointSequence
        } catch {
            result.problem = "\(error)"
        }
        return result
    }

    /// Device byte offset of a blob cluster's data, if allocated.
    public func deviceOffset(blob id: BlobID, cluster index: UInt64) -> UInt64? {
        guard let blob = blobs[id], let cluster = physicalCluster(blob, index) else { return nil }
        return superBlock.dataStartPage * UInt64(Self.pageBytes) + cluster * UInt64(clusterSizeBytes)
    }

    public var freeBlobIDCount: UInt64 { blobIDs.count - blobIDs.setCount }
}
