// goecho: a line echo server in Go, the baseline of benchmarks/workers.py.
//
//	goecho            listens on 127.0.0.1 (a free port), prints "listening on ADDR"
//
// One goroutine per connection reads lines (bufio, 64 KiB) and writes each back, flushing
// when no more input is buffered: the idiomatic Go echo server. Go's runtime uses every CPU
// (GOMAXPROCS, default the CPU count). The server exits when its stdin ends (the benchmark
// is gone) or on SIGTERM.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Printf("listening on %s\n", ln.Addr())
	go func() { // exit with the benchmark
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			continue
		}
		go serve(conn)
	}
}

func serve(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReaderSize(conn, 65536)
	w := bufio.NewWriterSize(conn, 65536)
	for {
		line, err := r.ReadSlice('\n')
		if len(line) > 0 {
			if _, werr := w.Write(line); werr != nil {
				return
			}
		}
		if err != nil && err != bufio.ErrBufferFull {
			w.Flush()
			return
		}
		if r.Buffered() == 0 && w.Flush() != nil {
			return
		}
	}
}
