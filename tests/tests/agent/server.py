import os, socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
def worker():
    s = socket.socket(socket.AF_INET6 if len(sys.argv) > 3 else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("::" if len(sys.argv) > 3 else "0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        try:
            c.recv(1024)
            body = str(os.getpid()).encode()
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        finally:
            c.close()
pids = []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        worker()
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
for p in pids:
    os.waitpid(p, 0)
