"""The HTTP side of `tcpwatch serve`.

listen      the ``[ADDRESS]:PORT`` the server binds, and its listening socket
webconfig   the exporter-toolkit web config file (TLS, basic auth users, rate limit, headers)
tls         `tls_server_config`: Go's names mapped onto OpenSSL, the server SSLContext
auth        basic auth against bcrypt hashes, failure budgets, verified credentials, rate limit
checks      the line of bcrypt checks and its one thread
app         routes: a request in, a response out, no sockets
exposition  /metrics format negotiation and the render cache
server      the listening socket's selector thread: accepting, reading, writing, shedding
connection  one connection: its state, buffers, deadlines, TLS start, non-blocking writes
wire        request heads in, response heads out
workers     the threads that answer complete requests
shedding    which connections give way at the connection cap
limits      every limit, and the descriptor budget
"""
