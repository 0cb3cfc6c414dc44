"""Wire protocols of the data path: HTTP/1.1 (httptools) and HTTP/2 (h2), both sides."""
