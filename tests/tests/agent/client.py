import socket, sys
# client.py first last conns port: per source 127.0.0.<i>, conns connections; prints src pid pid...
first, last, conns, port = map(int, sys.argv[1:5])
for i in range(first, last + 1):
    pids = []
    for _ in range(conns):
        s = socket.socket(); s.settimeout(3); s.bind(("127.0.0.%d" % i, 0)); s.connect(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n"); data = b""
        while True:
            d = s.recv(4096)
            if not d: break
            data += d
        s.close(); pids.append(data.split(b"\r\n\r\n", 1)[1].decode())
    print("127.0.0.%d" % i, " ".join(pids))
