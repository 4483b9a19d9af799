struct TablePage { static let entriesPerPage = 1018 }
