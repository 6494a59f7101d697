def search(index, query):
    words = query.split()
    best = words[0]  # crashes (IndexError) when the query is empty
    return sorted(index.get(best, []))
