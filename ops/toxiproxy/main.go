// Command toxiproxy-server is Toxiproxy's server with DIN's extra toxic, loss (loss.go), registered through
// Toxiproxy's custom-toxic API. It takes the flags DIN uses of the stock server: -host, -port, -config, -version.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

func main() {
	host := flag.String("host", "localhost", "address the HTTP API listens on")
	port := flag.String("port", "8474", "port the HTTP API listens on")
	config := flag.String("config", "", "JSON file of proxies to create at start-up")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Parse()

	if *version {
		fmt.Printf("toxiproxy-server version %s\n", toxiproxy.Version)
		return
	}
	zerolog.TimestampFunc = func() time.Time { return time.Now().UTC() }
	logger := zerolog.New(os.Stdout).With().Timestamp().Logger()
	if level, err := zerolog.ParseLevel(os.Getenv("LOG_LEVEL")); err == nil && level != zerolog.NoLevel {
		logger = logger.Level(level)
	}
	logger.Info().Str("version", toxiproxy.Version).Msg("Starting Toxiproxy with the loss toxic")

	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), logger)
	if *config != "" {
		server.PopulateConfig(*config)
	}
	addr := net.JoinHostPort(*host, *port)
	failed := make(chan error, 1)
	go func() { failed <- server.Listen(addr) }()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-failed:
		logger.Err(err).Str("addr", addr).Msg("API server stopped")
		os.Exit(1)
	case <-signals:
	}
	if err := server.Shutdown(); err != nil {
		logger.Err(err).Msg("Shutdown finished with an error")
	}
}
