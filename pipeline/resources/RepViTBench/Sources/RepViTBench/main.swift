// Usage: swift run -c release RepViTBench MODEL.mlpackage [--runs 100]
//            [--compute-units all|cpuOnly|cpuAndGPU|cpuAndNeuralEngine] [--out result.json]
// On a Mac this measures the Mac. For an iPhone, add this file's `measure` function to an
// app target and run it on the device (the JSON has the same fields).
import CoreML
import CoreVideo
import Foundation

struct Measurement: Codable {
    let device: String
    let os: String
    let compute_units: String
    let model: String
    let runs: Int
    let median_ms: Double
    let p90_ms: Double
    let load_ms: Double
}

func usage() -> Never {
    print("usage: RepViTBench MODEL.mlpackage [--runs N] "
        + "[--compute-units all|cpuOnly|cpuAndGPU|cpuAndNeuralEngine] [--out result.json]")
    exit(2)
}

func deviceName() -> String {
    #if os(macOS)
    var size = 0
    sysctlbyname("hw.model", nil, &size, nil, 0)
    var model = [CChar](repeating: 0, count: size)
    sysctlbyname("hw.model", &model, &size, nil, 0)
    return String(cString: model)
    #else
    var info = utsname()
    uname(&info)
    return withUnsafeBytes(of: &info.machine) { raw in
        String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
    }
    #endif
}

/// A mid-grey image of the size the model's `image` input asks for.
func greyImage(for model: MLModel) throws -> MLFeatureProvider {
    guard let constraint = model.modelDescription.inputDescriptionsByName["image"]?.imageConstraint else {
        fatalError("the model has no image input named 'image'")
    }
    var buffer: CVPixelBuffer?
    CVPixelBufferCreate(nil, constraint.pixelsWide, constraint.pixelsHigh,
                        kCVPixelFormatType_32BGRA, nil, &buffer)
    guard let pixels = buffer else { fatalError("could not allocate a pixel buffer") }
    CVPixelBufferLockBaseAddress(pixels, [])
    memset(CVPixelBufferGetBaseAddress(pixels), 128, CVPixelBufferGetDataSize(pixels))
    CVPixelBufferUnlockBaseAddress(pixels, [])
    return try MLDictionaryFeatureProvider(dictionary: ["image": MLFeatureValue(pixelBuffer: pixels)])
}

func measure(modelURL: URL, runs: Int, units: MLComputeUnits, unitsName: String) throws -> Measurement {
    let config = MLModelConfiguration()
    config.computeUnits = units
    let start = Date()
    let compiled = try MLModel.compileModel(at: modelURL)
    let model = try MLModel(contentsOf: compiled, configuration: config)
    let loadMs = Date().timeIntervalSince(start) * 1000
    let input = try greyImage(for: model)
    for _ in 0..<10 { _ = try model.prediction(from: input) }  // warm-up
    var times: [Double] = []
    for _ in 0..<runs {
        let t = DispatchTime.now().uptimeNanoseconds
        _ = try model.prediction(from: input)
        times.append(Double(DispatchTime.now().uptimeNanoseconds - t) / 1e6)
    }
    times.sort()
    return Measurement(
        device: deviceName(), os: ProcessInfo.processInfo.operatingSystemVersionString,
        compute_units: unitsName, model: modelURL.lastPathComponent, runs: runs,
        median_ms: times[times.count / 2], p90_ms: times[Int(Double(times.count - 1) * 0.9)],
        load_ms: loadMs)
}

let arguments = Array(CommandLine.arguments.dropFirst())
guard let modelPath = arguments.first else { usage() }
var runs = 100
var unitsName = "all"
var outPath = "repvitbench.json"
var index = 1
while index < arguments.count {
    guard index + 1 < arguments.count else { usage() }
    switch arguments[index] {
    case "--runs": runs = Int(arguments[index + 1]) ?? runs
    case "--compute-units": unitsName = arguments[index + 1]
    case "--out": outPath = arguments[index + 1]
    default: usage()
    }
    index += 2
}
let unitsByName: [String: MLComputeUnits] = [
    "all": .all, "cpuOnly": .cpuOnly, "cpuAndGPU": .cpuAndGPU, "cpuAndNeuralEngine": .cpuAndNeuralEngine,
]
guard let units = unitsByName[unitsName], runs > 0 else { usage() }
let result = try measure(modelURL: URL(fileURLWithPath: modelPath), runs: runs, units: units,
                         unitsName: unitsName)
let encoder = JSONEncoder()
encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
let data = try encoder.encode(result)
try data.write(to: URL(fileURLWithPath: outPath))
print(String(decoding: data, as: UTF8.self))
