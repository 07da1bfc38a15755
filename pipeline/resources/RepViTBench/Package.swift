// swift-tools-version:5.9
// RepViTBench: measure a Core ML model's prediction latency and write JSON that
// `python -m pipeline latency import` merges into the deploy report.
import PackageDescription

let package = Package(
    name: "RepViTBench",
    platforms: [.macOS(.v14), .iOS(.v17)],
    targets: [
        .executableTarget(name: "RepViTBench", path: "Sources/RepViTBench"),
    ]
)
