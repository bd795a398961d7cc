"""The HTTP side of `tcpwatch serve`.

listen     the ``[ADDRESS]:PORT`` the server binds
webconfig  the exporter-toolkit web config file (TLS, basic auth users, rate limit, headers)
auth       basic auth against bcrypt hashes and the request rate limit
app        routes: a request in, a response out, no sockets
server     the listening socket, its threads, TLS handshakes and timeouts
"""
